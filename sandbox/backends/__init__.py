"""What runs sandboxes, side by side behind one Protocol (`base.SandboxBackend`): `runsc` runs OCI
bundles directly, `docker` runs containers on a Docker Engine with the runsc runtime.

Nothing is imported here: the Docker SDK is loaded only by a fleet that uses Docker.
"""
