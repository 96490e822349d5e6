"""A stand-in vLLM server: the runtime LoRA endpoints of one pod, on a real socket.

It keeps vLLM's contract at the wire: `/v1/models` lists the base and the loaded adapters,
`/v1/load_lora_adapter` reads the adapter's `adapter_config.json` from `lora_path` and answers
400 for a rank above `--max-lora-rank`, a name already loaded, or no free slot (`--max-loras`),
`/v1/unload_lora_adapter` answers 404 for a name not loaded. `restart()` is a container
restart: same port, nothing loaded.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class FakeVllm:
    def __init__(self, model: str, *, max_lora_rank: int = 16, max_loras: int = 4) -> None:
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.loaded: dict[str, str] = {}  # served name → path
        self.load_calls: list[str] = []
        self.refuse: dict[str, str] = {}  # served name → the 400 message to answer
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._reply(404, {"error": {"message": "not found"}})
                data = [{"id": fake.model, "object": "model", "root": fake.model}]
                data += [
                    {"id": n, "object": "model", "root": p, "parent": fake.model}
                    for n, p in fake.loaded.items()
                ]
                self._reply(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, reply = fake.handle(self.path, body)
                self._reply(status, reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self) -> None:
        """A container restart: the same address, nothing loaded."""
        self.stop()
        self.loaded.clear()
        self.start()

    def handle(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("lora_name", "")
        if path == "/v1/unload_lora_adapter":
            if self.loaded.pop(name, None) is None:
                return 404, _error(f"The lora adapter '{name}' cannot be found.", 404)
            return 200, {}
        if path != "/v1/load_lora_adapter":
            return 404, _error("not found", 404)
        self.load_calls.append(name)
        if name in self.refuse:
            return 400, _error(self.refuse[name])
        if name in self.loaded:
            return 400, _error(f"The lora adapter '{name}' has already been loaded.")
        config = json.loads((Path(body["lora_path"]) / "adapter_config.json").read_text())
        if config["r"] > self.max_lora_rank:
            return 400, _error(
                f"LoRA rank {config['r']} is greater than max_lora_rank {self.max_lora_rank}."
            )
        if len(self.loaded) >= self.max_loras:
            return 400, _error(f"No free LoRA slot: max_loras is {self.max_loras}.")
        self.loaded[name] = body["lora_path"]
        return 200, {}


def _error(message: str, code: int = 400) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "code": code}}
