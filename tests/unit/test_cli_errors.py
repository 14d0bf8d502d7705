"""The one exit convention of every command-line tool: input errors are one line and exit 2, bugs keep their
traceback, --debug shows the traceback of input errors too."""
import os
import subprocess
import sys

import pytest

from msd_lora.cli.errors import exits_on_user_error, one_line
from msd_lora.errors import ConfigError, MissingPathError


def test_user_errors_exit_2_with_one_line(capsys):
    @exits_on_user_error
    def main(argv: list[str]) -> int:
        raise MissingPathError(f"{argv[0]} does not exist")

    assert main(["weights.safetensors"]) == 2
    assert capsys.readouterr().err == "error: weights.safetensors does not exist\n"


@pytest.mark.parametrize("bug", [KeyError("a bug"), RuntimeError("a bug"), ValueError("shape (3,) vs (4,)"),
                                 FileNotFoundError("an internal path")])
def test_bugs_keep_their_traceback(bug):
    @exits_on_user_error
    def main(argv: list[str]) -> int:
        raise bug

    with pytest.raises(type(bug)):
        main([])


def test_debug_prints_the_traceback_of_an_input_error(capsys):
    @exits_on_user_error
    def main(argv: list[str]) -> int:
        assert "--debug" not in argv  # taken off the command line before the tool parses it
        raise ConfigError("c.yaml: 'lora_rank' is 0; it must be >= 1")

    assert main(["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("error: c.yaml: 'lora_rank' is 0; it must be >= 1\n")


def test_disk_full_and_permission_denied_are_input_errors(capsys):
    import errno

    @exits_on_user_error
    def main(argv: list[str]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/lora.safetensors")

    assert main([]) == 2
    assert "No space left on device" in capsys.readouterr().err


def test_ctrl_c_exits_130(capsys):
    @exits_on_user_error
    def main(argv: list[str]) -> int:
        raise KeyboardInterrupt

    assert main([]) == 130


def test_multi_line_messages_print_as_one_line():
    err = ValueError("lora.safetensors does not fit this model:\n  2 of 4 layers not in the model\n  Likely cause: x")
    assert one_line(err) == "lora.safetensors does not fit this model: 2 of 4 layers not in the model; Likely cause: x"


BROKEN_STEP = """import sys
from msd_lora.backends.torch.backend import TorchBackend
def broken(self, *args, **kwargs):
    raise {exc}
TorchBackend.train_step = broken  # a failure inside the backend's tensor code, mid-run
from msd_lora.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("exc,name", [("RuntimeError('CUDA error: an illegal memory access')", "RuntimeError"),
                                      ("ValueError('operands could not be broadcast together')", "ValueError")])
def test_a_bug_inside_a_run_exits_nonzero_with_its_traceback(tmp_path, exc, name):
    """A non-input exception raised inside the backend during a real run keeps its traceback and exits 1, where a bad
    config key exits 2 with one line, and --debug adds that line's traceback."""
    from tests.conftest import tiny_args

    code = BROKEN_STEP.format(exc=exc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *tiny_args(tmp_path / "run", "--max_train_steps", "2")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr and f"{name}:" in done.stderr
    assert "in broken" in done.stderr  # the traceback reaches the frame that raised
    bad = subprocess.run([sys.executable, "-c", code, "--lora_rank", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'lora_rank' is 0" in bad.stderr
    debug = subprocess.run([sys.executable, "-c", code, "--lora_rank", "0", "--debug"], capture_output=True,
                           text=True, env=env)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
