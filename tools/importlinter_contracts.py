"""An import-linter contract for what import-linter cannot see: imported *names*.

``private_names``: no module imports a name that starts with ``_`` from a module
of another package (``from admmprune.core.projections import _memberships`` in
``admmprune.structure.gates`` breaks it; ``from ._records import _helper``
inside ``admmprune.structure.discovery`` does not). A private name is a
module's own business; what other packages need is public, documented and
kept stable. Modules are read with ``ast``, so imports inside functions and
on several lines count too.

Registered in ``pyproject.toml``'s ``[tool.importlinter]`` (``contract_types``);
``lint-imports`` puts the working directory on ``sys.path``, which is how it
finds this module.
"""

from __future__ import annotations

import ast
import importlib.util

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def _package(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = _package(module, is_package).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class PrivateNamesContract(Contract):
    """No ``_name`` is imported from a module outside the importer's own package.

    Configuration options:
        - packages: the packages whose modules are checked.
    """

    type_name = "private_names"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        roots = tuple(self.packages)
        violations = []
        for module in sorted(graph.modules):
            if not module.startswith(roots):
                continue
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            is_package = spec.submodule_search_locations is not None
            with open(spec.origin) as f:
                tree = ast.parse(f.read(), spec.origin)
            for node in ast.walk(tree):
                if not isinstance(node, ast.ImportFrom):
                    continue
                source = _resolve(node, module, is_package)
                if not source.startswith(roots) or source == "__future__":
                    continue
                for alias in node.names:
                    name = alias.name
                    if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
                        continue
                    # From a module of the importer's own package (or the package itself): fine.
                    source_package = source.rpartition(".")[0]
                    own = _package(module, is_package)
                    if source_package == own or source == own:
                        continue
                    violations.append(f"{module} imports {name} from {source} (l.{node.lineno})")
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["violations"]:
            output.print_error(f"- {line}", bold=False)
            output.new_line()
