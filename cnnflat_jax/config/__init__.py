"""The config schema: every field's default, rule and place in the run's identity.

``FIELDS`` has one row per field, ``MODEL_FIELDS`` one per field of
``config.model`` (which of those a model takes is its class's business)
(``fields.py``). ``defaults()`` is the default config (``configs/default.py``
returns it). A bad value raises ``ConfigError`` (``rules.py``), whose message
is one line::

    config.FIELD=VALUE: why; allowed: what would be accepted

``check`` runs before any data is read (``checks.py``); ``check_data`` right
after the data loads, for the limits that depend on it: image size,
training-set size, memory (``fit.py``, with the devices' limits).

Loading a config (``train.py --help`` too) imports no JAX: the modules that
name the choices (models, optimizers, ...) and the checks that run the model
import it, so they are imported when a config is checked, not here.
"""

from cnnflat_jax.config.checks import check, check_field
from cnnflat_jax.config.fields import (
    FIELDS,
    MODEL_FIELDS,
    Field,
    as_json,
    default_fields,
    defaults,
    flat_fields,
    is_identity,
)
from cnnflat_jax.config.fit import check_data
from cnnflat_jax.config.rules import ConfigError, Rule, show

__all__ = [
    "FIELDS",
    "MODEL_FIELDS",
    "ConfigError",
    "Field",
    "Rule",
    "as_json",
    "check",
    "check_data",
    "check_field",
    "default_fields",
    "defaults",
    "flat_fields",
    "is_identity",
    "show",
]
