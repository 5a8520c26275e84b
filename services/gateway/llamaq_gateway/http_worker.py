"""gunicorn's worker class for the gateway: uvicorn's, except for requests uvicorn's HTTP parser refuses.

nginx passes on some requests it tolerates but uvicorn's parser (httptools) does not: an unknown method, raw
non-ASCII bytes in the path, a control character in a header value. uvicorn answers those itself, before the
app runs, with a plain-text "Invalid HTTP request received."; here that answer is in the API's error shape.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from .errors import error_body

# The type and message of nginx's own 400 (nginx/nginx.conf): one answer for a malformed request, whoever parses it.
_BODY = json.dumps(error_body(400, "bad_request", "Malformed HTTP request."), separators=(",", ":")).encode()


class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        content = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(_BODY)).encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            _BODY,
        ])
        self.transport.write(b"".join(content))
        self.transport.close()


class GatewayWorker(UvicornWorker):
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": JsonErrorsHttpToolsProtocol}
