"""A scripted OpenAI-compatible chat server on 127.0.0.1 for testing our client's handling of its answers.

Replies depend only on the prompt (so runs are reproducible whatever the request order); faults are injected
by request number (429 with Retry-After, 500, a non-JSON body, a JSON body without choices) and only ever cause
retries.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from clara.data.corpus import sentences


def _doc(user: str) -> tuple[str, str]:
    m = re.search(r"\(title: (.*?)\):\n(.*?)\n\n", user, re.S)
    return (m.group(1), m.group(2)) if m else ("", "")


def reply_for(user: str) -> str:
    title, doc = _doc(user)
    sents = sentences(doc)
    if "simple questions" in user or "not yet covered" in user:
        return "\n".join(f"Question: Which three words open sentence {i + 1} about {title}?"
                         for i in range(len(sents)))
    if "complex questions" in user:
        return "Here are questions:\n1. How do the first and last sentences about %s relate?\nnot a question" % title
    if user.rstrip().endswith("Answer:"):
        q = re.search(r"Question: (.*)\nAnswer:", user).group(1)
        m = re.search(r"open sentence (\d+)", q)
        if m and int(m.group(1)) <= len(sents):
            return "Answer: " + " ".join(sents[int(m.group(1)) - 1].split()[:3])
        return "unanswerable"
    if "Proposed answer:" in user:
        q = re.search(r"Question: (.*)\n", user).group(1)
        n = re.search(r"sentence (\d+)", q)
        # Pairs about even-numbered sentences are judged wrong, so verification has something to reject.
        return "Incorrect" if n and int(n.group(1)) % 2 == 0 else "Correct."
    if "Rewrite this document" in user:
        return " ".join(reversed(sents))
    if "Rewritten:" in user:
        return "Yes"
    return "I do not understand."


class FakeOpenAI:
    def __init__(self, faults: dict[int, str] | None = None, delay: float = 0.0, always: str | None = None):
        self.faults = faults or {}
        self.delay = delay
        self.always = always
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str]):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    reply = outer.respond(n, payload)
                finally:
                    # Leave the in-flight count before answering: the client sends its next request on receipt.
                    with outer.lock:
                        outer.in_flight -= 1
                self._send(*reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def respond(self, n: int, payload: dict) -> tuple[int, bytes, dict[str, str]]:
        if self.delay:
            time.sleep(self.delay)
        fault = self.always or self.faults.get(n)
        if fault == "429":
            return 429, b'{"error": "slow down"}', {"Retry-After": "0"}
        if fault in ("500", "503", "401"):
            return int(fault), b"error", {}
        if fault == "garbage":
            return 200, b"<html>not json</html>", {}
        if fault == "nochoices":
            return 200, b'{"choices": []}', {}
        if fault == "hang":
            time.sleep(2.0)
        user = payload["messages"][-1]["content"]
        body = {"choices": [{"message": {"role": "assistant", "content": reply_for(user)}}]}
        return 200, json.dumps(body).encode(), {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
