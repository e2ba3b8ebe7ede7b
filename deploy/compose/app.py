"""A stand-in application for the compose demo: streams chat completions through hangup and,
like real users, stops reading half of them part way. Standard library only."""

import json
import os
import random
import time
import urllib.request


def one_request(base: str) -> int:
    """One streamed completion, abandoned part way or not; the number of lines read."""
    body = {
        "model": random.choice(["gpt-4o-mini", "normal:tokens=120", "slow-first-token:delay=2"]),
        "stream": True,
        "messages": [{"role": "user", "content": "Tell me a story."}],
    }
    request = urllib.request.Request(
        base + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer demo"},
    )
    give_up_after = random.choice([None, 5, 20, 40])  # lines read before hanging up
    read = 0
    with urllib.request.urlopen(request, timeout=60) as response:
        for _ in response:
            read += 1
            if give_up_after is not None and read >= give_up_after:
                break  # leaving the with-block closes the connection: hangup hangs up too
    return read


def main() -> None:
    base = os.environ.get("OPENAI_BASE_URL", "http://hangup:8080/v1")
    while True:
        try:
            one_request(base)
        except OSError as exc:
            print("request failed:", exc, flush=True)
            time.sleep(1)
        time.sleep(random.uniform(0.1, 0.5))


if __name__ == "__main__":
    main()
