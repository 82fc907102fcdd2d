"""Helpers for the sandbox's tests: an app on a real socket, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from clearhouse.embedded import free_port


@contextlib.asynccontextmanager
async def serving(app):
    """The app on a real socket; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def eventually(predicate, *, timeout: float = 10.0, interval: float = 0.02):
    """Wait until `predicate()` (sync or async) is truthy; returns its value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)
