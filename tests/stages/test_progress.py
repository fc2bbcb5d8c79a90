import io
import logging

from stages.progress import StepProgress


def test_without_a_terminal_logs_every_tenth_with_eta(caplog):
    caplog.set_level(logging.INFO)
    progress = StepProgress(total=50, initial=0, desc="nerf a red cube", logger=logging.getLogger("t"), stream=io.StringIO())
    for step in range(50):
        progress.update({"loss": 1.0 / (step + 1)})
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10  # steps 5, 10, …, 50
    assert lines[0].startswith("nerf a red cube: step 5/50 (10%), loss 0.2,")
    assert lines[-1].startswith("nerf a red cube: step 50/50 (100%)") and lines[-1].endswith("0m00s left")
    assert all("s/step" in line for line in lines)


def test_resumed_loop_counts_from_its_checkpoint(caplog):
    caplog.set_level(logging.INFO)
    progress = StepProgress(total=20, initial=13, desc="texture", logger=logging.getLogger("t"), stream=io.StringIO())
    for _ in range(7):
        progress.update({"loss": 0.5})
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["texture: step 14/20", "texture: step 16/20", "texture: step 18/20", "texture: step 20/20"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_draws_a_bar_and_logs_nothing(caplog):
    caplog.set_level(logging.INFO)
    stream = _Terminal()
    progress = StepProgress(total=10, initial=0, desc="edit", logger=logging.getLogger("t"), stream=stream)
    for _ in range(10):
        progress.update({"loss": 0.1})
    progress.close()
    assert not caplog.records
    assert "edit" in stream.getvalue() and "10/10" in stream.getvalue()
