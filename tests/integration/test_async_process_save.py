"""``checkpoint.async_mode=process`` under torchrun: DCP writes from a child process; checksums still land."""

from dtrain.checkpoint.cli import main as ckpt
from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.storage import Storage
from tests.helpers import TINY, torchrun


def test_process_mode_commits_verifiable_steps(tmp_path):
    result = torchrun(2, [*TINY, "checkpoint.interval_steps=3", "checkpoint.async_mode=process",
                          "trainer.max_steps=7", f"run.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EOFError" not in result.stderr  # the background process was stopped, not orphaned
    assert committed_steps(Storage(str(tmp_path / "checkpoints"))) == [6, 7]
    assert ckpt(["verify", str(tmp_path / "checkpoints")]) == 0
