"""End to end: `cllm crawl` feeds the real daemon's queue; the pages land in done/ and the store."""
import json
import os
import subprocess
import sys

from tests.daemonproc import daemon, wait_for  # noqa: F401 (fixture)
from tests.test_crawl import PROXY_VARS, _sites


def test_crawl_pages_reach_the_daemons_data_store(daemon, tmp_path):
    a, b = _sites()
    try:
        d = daemon("--no-train-auto-train")
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env["no_proxy"] = "*"
        r = subprocess.run([sys.executable, "-m", "cllm.crawl", a.url(), "--queue-dir", str(d.state / "queue"),
                            "--delay", "0", "--depth", "1", "--state", str(tmp_path / "crawl.sqlite"), "--json"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        queued = summary["queued"]
        assert queued >= 3
        wait_for(lambda: len([n for n in d.queue("done") if n.startswith("crawl-")]) == queued, 60,
                 "crawled pages in done/")
        assert not [n for n in d.queue("failed") if n.startswith("crawl-")]
        status = d.client.request("status")
        assert status["store"]["documents"] == queued
        d.stop()
        from cllmd.datastore import DataStore
        store = DataStore(d.model_dir() / "data", vocab_size=257)
        sources = {doc.source for doc in store.documents()}
        store.close()
        assert a.url("/index.html") in sources or a.url("/") in sources
        assert all(s.startswith(f"http://{a.host}/") for s in sources)
    finally:
        a.close()
        b.close()
