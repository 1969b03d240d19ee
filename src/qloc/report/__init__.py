"""The report (``qloc report``): one self-contained HTML page and its Markdown."""

from .page import open_in_browser, write_report

__all__ = ["open_in_browser", "write_report"]
