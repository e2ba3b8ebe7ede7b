"""`python -m bench.run_uvloop ARGS`: the hangup CLI on uvloop's event loop (if installed).

The CLI itself runs on asyncio's default loop; this measures what the optional `hangup[fast]`
extra would buy if the CLI installed uvloop's policy before `asyncio.run`.
"""

from __future__ import annotations

import sys

import uvloop

from proxy.__main__ import main

if __name__ == "__main__":
    uvloop.install()
    sys.exit(main())
