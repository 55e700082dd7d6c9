"""Caracal: causal language models with spectral (Multi-Head Fourier) mixing, and the baselines to compare."""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports `caracal_cli.hf_model` (which registers CaracalForCausalLM with transformers' Auto classes) right
    after transformers itself is imported, so `import caracal_cli` is enough for AutoModelForCausalLM to load an
    exported Caracal, and nothing imports transformers before someone asks for it (the CLI starts fast)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; the finders after it locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                import caracal_cli.hf_model  # noqa: F401

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    import caracal_cli.hf_model  # noqa: F401
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
