"""The Studio's Merge button (webui/handlers.py): `loraforge merge` in its own process on a
finished job's adapter, its progress streamed, the merged model beside the adapter dir."""

from __future__ import annotations

import sqlite3

from helpers import make_adapter

from loraforge.config import SFTConfig
from loraforge.webui.jobs import JobStore


def test_merge_button_merges_a_finished_jobs_adapter(tiny_model_dir, tmp_path):
    from loraforge.webui.handlers import Handlers

    store = JobStore(tmp_path / "home", command=["true"])
    job = store.submit(SFTConfig(model=str(tiny_model_dir)), name="grace")
    adapter = make_adapter(tiny_model_dir, job.output, seed=1)
    with sqlite3.connect(store.db_path) as db:  # as if its sft run had finished
        db.execute("UPDATE jobs SET state='finished' WHERE id=?", (job.id,))
    h = Handlers(engine=None, store=store, data_dir=tmp_path / "data")
    steps = list(h.on_merge(job.id))
    assert steps[0].startswith(f"merge of #{job.id} into")
    assert steps[-1].startswith("merge done in"), steps[-1]
    merged = adapter.with_name(adapter.name + "-merged")
    assert (merged / "config.json").is_file() and (merged / "loraforge_merge.json").is_file()
    assert "only a finished job" in next(iter(h.on_merge(None)))
