"""Helpers for Textual Pilot tests."""


async def until(pilot, cond, timeout=10.0):
    """Let the app run until `cond()` holds; fail after `timeout` seconds."""
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached")
