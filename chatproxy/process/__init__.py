"""Process control: the twistd plugin's service, worker processes and the
master, shared sockets, the admin listeners, journal logging and systemd
notifications.  The data path itself is :mod:`chatproxy.proxy`."""
