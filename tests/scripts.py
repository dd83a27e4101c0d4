"""Run a CLI in-process: `run_script("demo", [...])` calls scripts/demo.py's main(argv);
`run_script("convert/torch_to_flax", [...])` a script elsewhere in the repository."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, argv) -> int:
    path = ROOT / f"{name}.py" if "/" in name else ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{path.stem}_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in argv])
