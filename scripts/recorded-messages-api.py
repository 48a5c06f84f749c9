#!/usr/bin/env python3
"""A RECORDED stand-in for the Anthropic Messages API, for the demo without ANTHROPIC_API_KEY.

It is not a model: it serves `POST /v1/messages` in the Messages API wire format
(https://docs.anthropic.com/en/api/messages) and answers each request with the next recorded
reply file, in order (the last one again once they run out). The reply's `model` is
"recorded-reply", so the learner's records say what wrote the trace. Token counts are
estimates (4 bytes a token), marked as such in the log.

    recorded-messages-api.py --port-file FILE --reply REPLY.md [--reply …]

It listens on a free loopback port, writes the port to FILE, and logs each request on stderr.
"""

import argparse
import http.server
import json
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--reply", action="append", required=True, help="recorded reply text (repeatable)")
    args = ap.parse_args()
    replies = [open(p, encoding="utf-8").read() for p in args.reply]
    served = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server API)
            if self.path.rstrip("/") != "/v1/messages":
                self.send_error(404, "only POST /v1/messages")
                return
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                request = json.loads(body)
            except ValueError:
                self.send_error(400, "expected a JSON body")
                return
            text = replies[min(served[0], len(replies) - 1)]
            served[0] += 1
            prompt_bytes = len(json.dumps(request.get("messages", []))) + len(str(request.get("system", "")))
            reply = {
                "id": f"msg_recorded_{served[0]}",
                "type": "message",
                "role": "assistant",
                "model": "recorded-reply",
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": prompt_bytes // 4, "output_tokens": len(text) // 4},
            }
            out = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            print(
                f"recorded-messages-api: request {served[0]} ({prompt_bytes} prompt bytes) "
                f"answered with a RECORDED reply ({len(text)} bytes; token counts estimated)",
                file=sys.stderr,
                flush=True,
            )

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(args.port_file, "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
