"""The README's Python example runs as written (the first ```python block of the "## Python" section)."""
import os
import re
import subprocess
import sys

from conftest import REPO, child_env


def test_readme_python_example(tmp_path):
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text[text.index("\n## Python\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(tmp_path / "apple.png").size == (64, 64)
