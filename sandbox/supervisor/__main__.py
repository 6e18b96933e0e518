import sys

# The supervisor never speaks TLS and never compresses: without these, asyncio, hashlib, hmac and shutil
# take their fallbacks, and OpenSSL, liblzma and libbz2 stay out of its memory (5 MiB of its RSS inside
# gVisor, 3 MiB of a fresh sandbox's PSS; bench/fresh_memory.py). A None in sys.modules makes
# their import fail at once. Only this process: what it executes (the fork server, each server) is a
# Python of its own and imports them as usual.
for _unused in ("ssl", "_ssl", "_hashlib", "bz2", "lzma"):
    sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]

from sandbox.supervisor.main import main  # noqa: E402 - after the above, which must come before asyncio

sys.exit(main())
