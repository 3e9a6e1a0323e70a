"""What ``gateway contract`` prints: a table, or JUnit XML for CI."""

from __future__ import annotations

from xml.etree import ElementTree

from .kit import CheckResult

__all__ = ["junit_xml", "report"]


def report(results: list[CheckResult]) -> str:
    """The table ``gateway contract`` prints."""
    width = max(len(r.name) for r in results) if results else 0
    lines = [f"{'check':<{width}}  result  figures", f"{'-' * width}  ------  -------"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status.upper():<6}  {r.detail}")
    failed = sum(1 for r in results if r.status == "fail")
    passed = sum(1 for r in results if r.status == "pass")
    skipped = len(results) - failed - passed
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def junit_xml(results: list[CheckResult]) -> bytes:
    suite = ElementTree.Element(
        "testsuite",
        name="gateway contract",
        tests=str(len(results)),
        failures=str(sum(1 for r in results if r.status == "fail")),
        skipped=str(sum(1 for r in results if r.status == "skip")),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ElementTree.SubElement(
            suite, "testcase", classname="contract", name=r.name, time=f"{r.seconds:.3f}"
        )
        if r.status == "fail":
            ElementTree.SubElement(case, "failure", message=r.detail)
        elif r.status == "skip":
            ElementTree.SubElement(case, "skipped", message=r.detail)
        else:
            ElementTree.SubElement(case, "system-out").text = r.detail
    xml: bytes = ElementTree.tostring(suite, encoding="utf-8", xml_declaration=True)
    return xml
