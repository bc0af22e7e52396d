"""The README's worked example runs and does what it says."""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    example = (ROOT / "examples" / "toy_mlp.py").read_text()
    assert example in blocks


def test_example_prunes_to_the_stated_widths(capsys):
    runpy.run_path(str(ROOT / "examples" / "toy_mlp.py"), run_name="__main__")
    out = capsys.readouterr().out
    widths, loss = re.search(r"kept widths: \[(\d+), (\d+)\] loss: ([\d.e-]+)", out).group(1, 2), None
    assert widths == ("6", "6")  # 90% of 64 neurons removed in each hidden layer
    loss = float(re.search(r"loss: ([\d.e+-]+)", out).group(1))
    assert loss < 0.01  # the target variance is about 0.83
