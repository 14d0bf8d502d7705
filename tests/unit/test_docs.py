from pathlib import Path

from tools.gen_config_docs import DOC, render


def test_configs_doc_lists_every_option():
    text = Path(DOC).read_text()
    assert render(text) == text, "docs/configs.md is stale: run python tools/gen_config_docs.py"
