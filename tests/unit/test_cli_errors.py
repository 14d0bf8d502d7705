"""The one exit convention of every command-line tool."""
import pytest

from msd_lora.cli.errors import exits_on_user_error


def test_user_errors_exit_2_with_one_line(capsys):
    @exits_on_user_error
    def main(path: str) -> int:
        raise FileNotFoundError(f"{path} does not exist")

    assert main("weights.safetensors") == 2
    assert capsys.readouterr().err == "error: weights.safetensors does not exist\n"


def test_bugs_keep_their_traceback():
    @exits_on_user_error
    def main() -> int:
        raise KeyError("a bug, not a bad input")

    with pytest.raises(KeyError):
        main()
