"""Caracal: causal language models with spectral (Multi-Head Fourier) mixing, and the baselines to compare."""

import importlib.abc
import sys

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        import caracal_cli.hf_model  # noqa: F401  (registers CaracalForCausalLM with the Auto classes)
    except Exception as err:  # an unsupported transformers must not break the user's own import of it
        import warnings

        warnings.warn(f"caracal: CaracalForCausalLM is not registered with transformers ({type(err).__name__}: "
                      f"{err}); exported Caracal, SWH and Jamba-like models will not load", stacklevel=2)


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Registers CaracalForCausalLM with transformers' Auto classes right after transformers itself is imported,
    so `import caracal_cli` is enough for AutoModelForCausalLM to load an exported Caracal while nothing imports
    transformers before someone asks for it (the CLI starts fast). It wraps the module spec the other finders give
    for `transformers`; a mere probe (importlib.util.find_spec) executes nothing, and the finder stays until the
    import really happens."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_with_transformers()

        loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
