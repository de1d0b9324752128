"""Sphinx configuration: the guide pages (Markdown, through MyST) and the API
reference from the public modules' docstrings (autodoc, Google style through
napoleon). Built offline with warnings as errors:

    sphinx-build -W -b html docs docs/_build/html
"""

import re

project = "cnnflat_jax"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
html_theme = "alabaster"
# Keep the public aliases' names instead of their expansions (ArrayLike is a union of 8 types).
autodoc_type_aliases = {
    "ArrayLike": "jax.typing.ArrayLike",
    "IntOrPair": "IntOrPair",
    "Padding": "Padding",
}


def _alias_names(app, what, name, obj, options, signature, return_annotation):
    """Sphinx 9 writes an alias inside a union as ``TypeAliasForwardRef('NAME')``: keep NAME."""
    unwrap = lambda text: text and re.sub(r"TypeAliasForwardRef\('([\w.]+)'\)", r"\1", text)  # noqa: E731
    return unwrap(signature), unwrap(return_annotation)


def setup(app):
    app.connect("autodoc-process-signature", _alias_names)
