"""fastworker: run PHP background jobs through PHP-FPM over keep-alive FastCGI connections."""

__version__ = "0.1.0"
