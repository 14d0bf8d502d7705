"""An output folder belongs to one job: a previous job's results are refused, replaced only when asked, never
written through a planted link, and two jobs cannot write into one folder at once."""
import os
import subprocess
import sys

import pytest

from msd_lora.errors import RunFolderError, UnwritablePathError
from msd_lora.output_folder import OutputFolder, open_for_writing

OWNED = ("lora.safetensors", "ckpt", "train_log.csv", "grid-*.png")


def folder(path, **kw) -> OutputFolder:
    return OutputFolder(path, OWNED, "training run", **kw)


def test_a_folder_holding_a_previous_run_is_refused(tmp_path):
    (tmp_path / "lora.safetensors").write_text("old")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(RunFolderError, match=r"holds a previous training run \(ckpt/, lora.safetensors\): pass "
                                             r"--resume True to continue it, --overwrite True to replace it"):
        folder(tmp_path).check()
    folder(tmp_path, resume=True).check()  # resuming it is what the folder is for


def test_overwrite_removes_exactly_the_previous_outputs(tmp_path):
    (tmp_path / "lora.safetensors").write_text("old")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "lora-000100.safetensors").write_text("stale")
    (tmp_path / "grid-000.png").write_text("stale")
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "samples_base").mkdir()
    job = folder(tmp_path, overwrite=True)
    with job.claimed():
        assert sorted(job.replaced) == ["ckpt/", "grid-000.png", "lora.safetensors"]
        assert sorted(os.listdir(tmp_path)) == [".msd_lora.lock", "notes.txt", "samples_base"]


def test_a_second_job_into_a_folder_in_use_fails_at_once(tmp_path):
    with folder(tmp_path).claimed():
        with pytest.raises(RunFolderError, match=rf"output_path '{tmp_path}' is in use by another msd-lora job "
                                                 rf"\(pid {os.getpid()}\)"):
            with folder(tmp_path).claimed():
                pass
    with folder(tmp_path).claimed():  # released when the first job ended
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    code = ("import os, sys\nfrom msd_lora.output_folder import OutputFolder\n"
            f"with OutputFolder({str(tmp_path)!r}, ('x',), 'run').claimed():\n    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with folder(tmp_path).claimed():
        pass


def test_links_planted_where_a_run_writes_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt").symlink_to(elsewhere)
    with pytest.raises(RunFolderError, match=r"symbolic links where the training run writes \(ckpt\)"):
        folder(run, resume=True).check()
    with folder(run, overwrite=True).claimed():  # the link itself is removed, not what it points to
        assert not (run / "ckpt").exists() and elsewhere.is_dir()
    (run / "train_log.csv").symlink_to(elsewhere / "victim.csv")
    with pytest.raises(UnwritablePathError, match="is a symbolic link: msd-lora does not write through links"):
        open_for_writing(run / "train_log.csv")
    assert not (elsewhere / "victim.csv").exists()


def test_unwritable_output_path_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UnwritablePathError, match=r"output_path '.*a_file/run' cannot be created"):
        folder(blocker / "run").check()
