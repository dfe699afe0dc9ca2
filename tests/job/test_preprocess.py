"""The job's CPU stage: images behind URLs are fetched concurrently; a row whose fetch fails fails alone."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from test_sources import png

from pipeline.job.preprocess import PREPARED_SCHEMA, decode_prepared, prepare_batch
from pipeline.job.sources import SOURCE_SCHEMA

ROWS = 8


@pytest.fixture
def image_server():
    """A loopback HTTP server whose image requests each wait until ROWS of them are in flight together (a
    barrier): fetched one after another, the first would time out and its row would carry the error."""
    barrier = threading.Barrier(ROWS, timeout=20)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/missing"):
                self.send_error(404)
                return
            if self.path.startswith("/slow/"):
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    self.send_error(503, "requests did not overlap")
                    return
            body = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_images_behind_urls_are_fetched_concurrently(targets, image_server):
    target = targets["llava"]
    rows = [{"id": f"r{i}", "prompt": "What is shown?", "image": None, "image_url": f"{image_server}/slow/{i}.png",
             "error": None} for i in range(ROWS)]
    rows.append({"id": "gone", "prompt": "What is shown?", "image": None, "image_url": f"{image_server}/missing.png",
                 "error": None})
    out = prepare_batch(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), target.processor, target.context_length)
    assert out.schema == PREPARED_SCHEMA
    prepared = {row["id"]: row for row in out.to_pylist()}
    assert all(prepared[f"r{i}"]["error"] is None for i in range(ROWS)), [r["error"] for r in prepared.values()]
    assert all(decode_prepared(prepared[f"r{i}"]["prepared"]).vision_inputs for i in range(ROWS))
    assert prepared["gone"]["prepared"] is None and "missing.png" in prepared["gone"]["error"]
