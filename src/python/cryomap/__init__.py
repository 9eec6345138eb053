"""cryomap: cryo-EM reconstruction by Bayesian MAP expectation-maximisation (RELION's method,
RELION's files).

The Python API (docs/api.md) works on objects in memory or on files, and every run returns
its maps as `Volume`s and its per-particle table as a pandas DataFrame:

- `Volume(array, pixel_size)`: a map with its pixel size; `Volume.read(path)`,
  `Volume.phantom(box, pixel_size)`, `.save(path)`, `.asnumpy()`, `.project(angles)`,
  `.fsc(other)` (`.resolution(0.143)`), `.lowpass(resolution)`.
- Particle sets: `read_particles(path)` (RELION STAR or cryoSPARC .cs, images read lazily)
  and `particles_from_images(images, pixel_size, table)` (images in a numpy array); both are
  `ParticleSet`s (`.particles` and `.optics` tables, `.read_images(rows)`, `.save(path)`).
- `simulate(...)`: particles of a map or of the built-in phantom, with the true poses.
- `refine(particles, reference)`: 3D auto-refinement with gold-standard half-sets.
- `classify3d(particles, reference, n_classes=K)`, `classify2d(particles, n_classes=K)`.
- `hetero_refine(particles, reference, n_classes=K)`: heterogeneous refinement, gold-standard
  half-sets per class.
- `reconstruct(particles)`: the map from the particles' known poses.
- `set_threads(n)` / `get_threads()`: OpenMP threads of the C++ kernels.

With `outdir=None` (the default) a run writes nothing; with an output folder it writes
RELION's layout there, as the `cryomap` command line (which goes through these functions).

Example (docs/api.md has it at test sizes, run by the test suite):

    import cryomap
    truth = cryomap.Volume.phantom(box=64, pixel_size=3.0)
    sim = cryomap.simulate(truth, n=2000, snr=0.1)
    result = cryomap.refine(sim.particles, truth.lowpass(60.0), particle_diameter=180)
    result.map.asnumpy(), result.map.pixel_size, result.resolution, result.particles
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# The API is imported on first use (PEP 562), so that `import cryomap` (and the CLI's --help)
# does not pay for pandas and the kernels: name -> the module that defines it.
_API = {
    **dict.fromkeys(("ClassifyResult", "ReconstructResult", "RefineResult", "SimulationResult",
                     "classify2d", "classify3d", "get_threads", "hetero_refine",
                     "particles_from_images", "read_particles", "reconstruct", "refine",
                     "set_threads", "simulate"),
                    ".api"),
    "InputError": ".errors",
    "ParticleSet": ".particles",
    "FSC": ".volume",
    "Volume": ".volume",
}

__all__ = ["Volume", "FSC", "ParticleSet", "particles_from_images", "read_particles",
           "simulate", "refine", "classify3d", "classify2d", "hetero_refine", "reconstruct",
           "set_threads",
           "get_threads", "SimulationResult", "RefineResult", "ClassifyResult",
           "ReconstructResult", "InputError", "__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cryomap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """The package module: the name `cryomap.simulate` is the API function, also once the
    submodule `cryomap.simulate` is loaded (the import system would bind the module to it;
    the module stays in sys.modules)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
