"""The HTTP face: the app and its routes as views over the service (``app``), every
endpoint once (``endpoints``), the edges a body and a connection pass (``edges``),
the hosts a keyless server answers (``hosts``), the OpenAPI document (``openapi``)
and the dashboard with its files (``dashboard``, ``web/``)."""
