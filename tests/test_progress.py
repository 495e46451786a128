"""Long stages show how many of how many on stderr when the CLI runs them, and nothing under --quiet or when the
library is called directly (tests, notebooks)."""
from lmmlab import progress
from lmmlab.cli import main


def test_the_cli_shows_stage_progress_unless_quiet(tiny_llava_dir, tmp_path, capsys):
    args = ["ablate-kv", "--model", str(tiny_llava_dir), "--task", "shapes", "--widths", "16", "4", "--no-mixed",
            "--kv-group-size", "4", "--kv-residual", "4", "--n", "8"]
    assert main(args + ["--out", str(tmp_path / "a.csv")]) == 0
    shown = capsys.readouterr().err
    assert "ablate-kv (plans)" in shown and "2/2" in shown
    assert main(["--quiet", *args, "--out", str(tmp_path / "b.csv")]) == 0
    assert "ablate-kv (plans)" not in capsys.readouterr().err
    assert progress.ENABLED is False  # the CLI leaves the library's switch as it found it


def test_the_library_is_quiet_unless_asked(capsys):
    for _ in progress.bar(range(3), desc="a quiet stage"):
        pass
    for _ in progress.bar(range(3), desc="an asked-for stage", enabled=True):
        pass
    err = capsys.readouterr().err
    assert "a quiet stage" not in err and "an asked-for stage" in err and "3/3" in err
