"""The job's CPU stage: images behind URLs are fetched concurrently; a row whose fetch fails fails alone; the probe
row that sizes the job's blocks is as large as a prepared row."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest
from test_sources import png

from pipeline.job.caption import MIN_BLOCK_BYTES, actor_blocks, block_bytes
from pipeline.job.config import CaptionConfig
from pipeline.job.preprocess import PREPARED_SCHEMA, decode_prepared, prepare_batch, prepared_row_bytes
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


def test_blocks_hold_about_an_actor_block_of_prepared_rows(targets):
    """The probe row (preflight's) is as large as a row prepared from a real image, to a few token ids (LLaVA's
    processor resizes every image to one size); the job's blocks hold one actor block of such rows, within bounds."""
    target = targets["llava"]
    row = {"id": "r", "prompt": "What colour is the shape in this picture?", "image": png(size=(40, 30)),
           "image_url": None, "error": None}
    prepared = prepare_batch(pa.Table.from_pylist([row], schema=SOURCE_SCHEMA), target.processor,
                             target.context_length).to_pylist()[0]
    probe = prepared_row_bytes(target.processor, target.context_length)
    assert prepared["error"] is None and abs(probe - len(prepared["prepared"])) <= 8 * 16

    config = CaptionConfig(input="unused", output="unused", target="unused", batch_size=32)
    ray_default = 128 * 2**20
    assert block_bytes(config, 100_000, ray_default) == actor_blocks(config)[0] * 100_000
    assert block_bytes(config, 10, ray_default) == MIN_BLOCK_BYTES  # tiny blocks cost more to hand on than to carry
    assert block_bytes(config, 10 * 2**20, ray_default) == ray_default  # never above Ray's own
    assert block_bytes(config, None, ray_default) == ray_default  # a probe that could not be prepared
