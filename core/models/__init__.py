"""The fleet's models: providers behind one router (`core.models.api` says what every part may rely on)."""
