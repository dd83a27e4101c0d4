"""Run a script under scripts/ in-process: `run_script("demo", [...])` calls its main(argv)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, argv) -> int:
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in argv])
