"""API keys: the check every request passes (``auth``), their administration
(``admin``, no web framework) and the ``trioagg keys`` commands (``commands``)."""
