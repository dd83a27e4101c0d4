"""Run a CLI in-process: `run_script("demo", [...])` calls scripts/demo.py's main(argv);
`run_script("convert/torch_to_flax", [...])` a script elsewhere in the repository; `load_script`
gives the module (e.g. its build_parser)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the console command `pip install` puts next to the interpreter (pyproject's [project.scripts])
ENTRY_POINT = Path(sys.executable).with_name("diad-jax")


def load_script(name: str):
    """The module of a CLI script (not run)."""
    path = ROOT / f"{name}.py" if "/" in name else ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{path.stem}_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(name: str, argv) -> int:
    return load_script(name).main([str(a) for a in argv])
