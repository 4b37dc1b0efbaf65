"""A library of adapters on disk, loaded into one model by name when first asked for.

    library = AdapterLibrary(model, "adapters/")   # each sub-folder is one adapter directory
    library.entries()          # what is there: r, alpha, targets, base fingerprint (configs only)
    library.ensure(["upper", None, "swap"])       # load those not loaded yet; None is the base
    library.unload("upper")    # take it off the model again

An adapter is named by its folder (adapters/upper holds adapter "upper"), in the layout of
lora/io.py. Listing reads only the small adapter_config.json files: a server with hundreds of
adapters on disk keeps in memory only those that requests have asked for. Loading goes through
lora.load_adapter, which checks the config, the base fingerprint and every tensor's key and
shape before it touches the model, so an adapter written for another base is refused with the
model unchanged. Loaded adapters are added inactive: a request picks its adapter per row
(lora.mixed_adapters) or by set_active_adapters.
"""
from dataclasses import dataclass
from pathlib import Path

from ..inject import adapter_names
from ..io import CONFIG_NAME, base_fingerprint, load_adapter, read_adapter_config
from .layer import check_adapter_name
from .multi import delete_adapter


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter directory, as its config describes it."""
    name: str
    path: Path
    r: int
    alpha: float
    targets: tuple
    fingerprint: str      # the base it was written for (None in configs written by PEFT)
    fits: bool            # the fingerprint is this model's, or there is none to check
    loaded: bool

    def row(self):
        return [self.name, self.r, self.alpha, ",".join(self.targets),
                self.fingerprint or "-", "yes" if self.fits else "NO",
                "yes" if self.loaded else "no"]


class AdapterLibrary:
    """The adapter directories under `root`, loaded into `model` on demand."""

    HEADERS = ["adapter", "r", "alpha", "targets", "base fingerprint", "fits", "loaded"]

    def __init__(self, model, root):
        self.model, self.root = model, Path(root)
        if not self.root.is_dir():
            raise ValueError(f"adapter library {self.root}: not a folder")
        self.paths = {p.name: p for p in sorted(self.root.iterdir())
                      if (p / CONFIG_NAME).is_file()}
        for name in self.paths:
            check_adapter_name(name)
        self.loaded = set()

    def names(self):
        return list(self.paths)

    def entries(self):
        """[AdapterEntry] for every adapter directory (reads the configs, not the weights)."""
        fingerprint = base_fingerprint(self.model)
        found = []
        for name, path in self.paths.items():
            config = read_adapter_config(path / CONFIG_NAME)
            want = config["base_model_fingerprint"]
            found.append(AdapterEntry(name, path, config["r"], config["lora_alpha"],
                                      tuple(config["target_modules"]), want,
                                      want is None or want == fingerprint, name in self.loaded))
        return found

    def load(self, name):
        """Load adapter `name` into the model, inactive. Refused, the model unchanged, when it
        was written for another base, is broken, or the model already has that name."""
        path = self._path(name)
        if name in adapter_names(self.model):
            raise ValueError(f"the model already has an adapter {name!r}")
        load_adapter(self.model, path, adapter_name=name, activate=False)
        self.loaded.add(name)

    def ensure(self, names):
        """Load every adapter in `names` not loaded yet (None, the base, is skipped); checks
        that all of them are in the library before loading any."""
        wanted = [n for n in dict.fromkeys(names) if n is not None]
        for name in wanted:
            self._path(name)
        for name in wanted:
            if name not in self.loaded:
                self.load(name)

    def unload(self, name):
        """Remove adapter `name` from the model (its folder stays in the library)."""
        if name not in self.loaded:
            raise ValueError(f"adapter {name!r} is not loaded; loaded: {sorted(self.loaded)}")
        delete_adapter(self.model, name)
        self.loaded.discard(name)

    def _path(self, name):
        if name not in self.paths:
            raise ValueError(f"no adapter {name!r} in {self.root}; it has {self.names()}")
        return self.paths[name]
