"""A gain_mlx.serve server running in this process on a free port, for the HTTP tests."""

import json
import threading
import urllib.error
import urllib.request


class Running:
    """``Engine`` + ``make_server`` on 127.0.0.1, serving from a daemon thread.
    ``server_kw`` go to ``make_server``, the rest to ``Engine``."""

    def __init__(self, model_dir, adapters, api_key=None, server_kw=None, **engine_kw):
        from gain_mlx.serve import Engine, make_server

        self.engine = Engine(str(model_dir), [(n, str(p)) for n, p in adapters.items()], **engine_kw)
        self.server = make_server(self.engine, port=0, api_key=api_key, **(server_kw or {}))
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self, key="unused"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def raw(self, method, path, body=None, headers=None, data=None):
        """``(status, parsed JSON)`` of a request sent by hand."""
        if data is None and body is not None:
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if data is not None and "Content-Type" not in (headers or {}):
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.engine.close()
