"""The ``vitqc`` command line (see ``vitqc --help``)."""
