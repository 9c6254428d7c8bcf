"""The processes that serve: what only such a process may do (``process``: settings
from the environment, exit code 2, signals, logging), serving the app over HTTP
with one contained task per connection (``serving``), and the supervisor that
starts and restarts the workers of ``trioagg serve --workers N`` (``supervisor``)."""
