"""The parts of the gateway (docs/architecture.md) and the one direction of their
imports: no part imports one above it, so none can come to depend on itself."""

from __future__ import annotations

import ast
from pathlib import Path

import gateway

PACKAGE = Path(gateway.__file__).parent
# The modules at the top of the package that every part may use.
BASE = {"errors", "settings", "config", "logs"}
# What each part may import besides itself and the base. The top (``gateway.app``,
# ``gateway.cli``, ``__init__``, ``__main__``) assembles them all.
MAY_IMPORT = {
    "base": set(),
    "server": set(),
    "provider": set(),
    "core": {"provider"},
    "cluster": {"core"},
    "resume": {"core", "cluster"},
    "tools": {"server"},
    "web": {"core", "provider", "cluster", "resume", "tools", "server"},
}


def part_of(module: str) -> str:
    """``gateway.core.session`` → ``core``; a module at the top → ``base`` or ``top``."""
    names = module.split(".")
    if len(names) > 2 or (len(names) == 2 and (PACKAGE / names[1]).is_dir()):
        return names[1]
    return "base" if names[-1] in BASE else "top"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The gateway modules ``path`` imports (relative imports resolved; type-only
    imports included)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            if source == "gateway" or source.startswith("gateway."):
                if node.module is None:
                    # ``from . import x``: a module of the package.
                    found |= {f"{source}.{a.name}" for a in node.names}
                else:
                    found.add(source)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gateway.")}
    return found


def test_every_part_imports_only_the_parts_below_it() -> None:
    wrong: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = part_of(module_name(path))
        if here == "top":
            continue
        allowed = {here, "base", *MAY_IMPORT[here]}
        for target in sorted(imported(path)):
            if target == "gateway":
                wrong.append(f"{module_name(path)} imports the package itself")
            elif part_of(target) not in allowed:
                wrong.append(f"{module_name(path)} ({here}) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_in_a_part() -> None:
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert parts == set(MAY_IMPORT) - {"base"}
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == BASE | {"__init__", "__main__", "app", "cli"}


def test_the_public_names_are_the_app_factory_the_settings_and_the_errors() -> None:
    from gateway import errors

    errors_defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.GatewayError)
    }
    assert set(gateway.__all__) == errors_defined | {"Settings", "create_app"}
