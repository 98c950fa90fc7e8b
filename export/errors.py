"""The one error type the exporter raises for problems a user can fix; the CLI prints its message alone."""


class ExportError(ValueError):
    pass
