"""MkDocs hook: publish MathJax 3 with the site, so that formulas render without any network.

How it works
------------
* The ``docs`` extra of ``setup.py`` installs the PyPI package ``django-static-mathjax`` (3.2.2.x). Despite its
  name it has no dependency (no Django): it is MathJax 3.2.2 as released, laid out under
  ``<site-packages>/mathjax/static/mathjax/``, with the browser bundles in ``es5/``.
* ``mkdocs.yml`` loads ``javascripts/mathjax.js`` (the configuration, ``window.MathJax = {...}``) and then
  ``javascripts/mathjax/tex-mml-chtml.js``, a path that exists in no folder of the repository.
* This hook (``hooks:`` in ``mkdocs.yml``) adds MathJax's files to the build, at ``on_files``, as files of the site
  under ``javascripts/mathjax/``: the ``tex-mml-chtml.js`` bundle and every component it may load later
  (``output/chtml/fonts/`` for the fonts, ``input/tex/extensions/`` for the TeX packages loaded on demand,
  ``ui/``, ``a11y/`` and ``sre/`` for the context menu and the accessibility tools, ``output/svg*`` for the
  menu's SVG renderer), with MathJax's LICENSE. ``mkdocs build`` copies them into ``site/`` like any other
  static file and ``mkdocs serve`` serves them, so nothing is written into ``docs/`` and no third-party
  JavaScript is committed. MathJax finds its components and fonts relative to the URL of ``tex-mml-chtml.js``.
  The other combined bundles of the package (``tex-svg.js``, ``mml-chtml.js``...) and its Node.js-only
  files are left out: about 10 MB are published instead of 24.
* Where the package is missing (a virtual environment without the ``docs`` extra), the hook says so in an INFO
  line and points the script at MathJax's CDN instead, so that the build still passes; only such a site needs
  the network to show formulas. ``make docs`` always installs the ``docs`` extra.

``mkdocs.yml`` excludes this folder (``exclude_docs: /hooks/``) from the site.
"""
import importlib.util
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Tuple

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

LOG = logging.getLogger("mkdocs.hooks.offline_mathjax")

PACKAGE = "django-static-mathjax"   # the PyPI distribution; its import name is ``mathjax``
SITE_FOLDER = "javascripts/mathjax"  # where MathJax lands in the site
BUNDLE = "tex-mml-chtml.js"          # the combined component that mkdocs.yml loads
SCRIPT = f"{SITE_FOLDER}/{BUNDLE}"
CDN_SCRIPT = f"https://cdn.jsdelivr.net/npm/mathjax@3/es5/{BUNDLE}"
# Top-level folders of es5/ that are never loaded by a browser page.
SKIPPED_FOLDERS = {"adaptors"}


def _mathjax_root() -> Optional[Path]:
    """The ``static/mathjax`` folder of the installed package (holding ``es5/``), or None if not installed."""
    try:
        spec = importlib.util.find_spec("mathjax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "static" / "mathjax"
        if (root / "es5" / BUNDLE).is_file():
            return root
    return None


def _check_version(root: Path) -> str:
    """MathJax's version; the configuration in ``docs/javascripts/mathjax.js`` is written for MathJax 3."""
    version = json.loads((root / "package.json").read_text(encoding="utf-8")).get("version", "")
    if not version.startswith("3."):
        raise PluginError(f"{PACKAGE} ships MathJax {version or '(unknown version)'} from {root}, but "
                          "docs/javascripts/mathjax.js configures MathJax 3: "
                          "pip install 'django-static-mathjax>=3.2.2,<4'")
    return version


def _published(root: Path) -> Iterator[Tuple[str, Path]]:
    """(path in the site, file on disk) for every MathJax file the site needs, and MathJax's licence."""
    es5 = root / "es5"
    for path in sorted(es5.rglob("*")):
        if not path.is_file():
            continue
        relative = PurePosixPath(path.relative_to(es5).as_posix())
        if len(relative.parts) == 1:
            if relative.name != BUNDLE:  # another combined bundle, or a part already inside the bundle
                continue
        elif relative.parts[0] in SKIPPED_FOLDERS:
            continue
        yield f"{SITE_FOLDER}/{relative}", path
    if (root / "LICENSE").is_file():
        yield f"{SITE_FOLDER}/LICENSE", root / "LICENSE"


def _script_entry_index(config: MkDocsConfig) -> int:
    """Position of the local MathJax bundle in ``extra_javascript`` (entries are strings or ExtraScriptValue)."""
    for index, entry in enumerate(config.extra_javascript):
        if str(entry) == SCRIPT:
            return index
    raise PluginError(f"offline_mathjax: mkdocs.yml's extra_javascript must list {SCRIPT} "
                      "(after javascripts/mathjax.js, the configuration)")


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Find the packaged MathJax, or fall back to the CDN when it is not installed."""
    index = _script_entry_index(config)
    root = _mathjax_root()
    if root is None:
        LOG.info("%s is not installed (pip install -e '.[docs]'): formulas will load MathJax from %s, "
                 "so this site needs the network to show them", PACKAGE, CDN_SCRIPT)
        entry = config.extra_javascript[index]
        if isinstance(entry, str):
            config.extra_javascript[index] = CDN_SCRIPT
        else:
            entry.path = CDN_SCRIPT
    else:
        LOG.debug("offline_mathjax: MathJax %s from %s", _check_version(root), root)
    config["offline_mathjax_root"] = root  # read back by on_files (None: nothing to publish)
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add MathJax's files to the site, under ``javascripts/mathjax/``."""
    root = config.get("offline_mathjax_root")
    if root is None:
        return files
    for src_uri, path in _published(root):
        if files.get_file_from_path(src_uri) is not None:
            raise PluginError(f"offline_mathjax: docs/{src_uri} exists; MathJax is published from {PACKAGE}, "
                              f"remove docs/{SITE_FOLDER}/")
        files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files
