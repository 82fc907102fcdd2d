"""A relay in its own OS process, so tests can SIGKILL it like production would."""

import asyncio
import sys

from shared.relay import Relay


async def main(service: str, database_url: str, bootstrap: str) -> None:
    await Relay(service=service, database_url=database_url, bootstrap=bootstrap, poll_interval_s=0.2).run(
        asyncio.Event()
    )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
