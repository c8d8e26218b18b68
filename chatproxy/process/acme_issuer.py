"""Getting one certificate from an ACME CA (RFC 8555) with the ``acme``
library (certbot's): the account, an order for the names, HTTP-01 challenges
answered by chatproxy's plain listeners, the certificate.

The ``acme`` client is blocking (``requests``): :meth:`AcmeIssuer.issue` is
run in a thread by :mod:`chatproxy.process.renewal`, never in the reactor.
Challenges are answered through files (one per token, holding the key
authorization) in a directory that every process serving a plain listener
reads (:class:`chatproxy.proxy.plain.ChallengeFiles`), so that with workers
the master alone talks to the CA.  The account key (EC P-256) is kept as
``ACCOUNT_DIRECTORY/account.key`` (mode 0600) and used again on every order;
each certificate gets a new EC P-256 key.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from josepy.jwa import ES256
from josepy.jwk import JWKEC
from acme import challenges, client, crypto_util, errors, messages
from attrs import frozen
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chatproxy.config import AcmeAccount
from chatproxy.proxy.tls import write_file, write_private_key

__all__ = ["AcmeIssuer", "IssueError", "Issued"]

#: How long one request to the CA may take, and one whole order.
NETWORK_TIMEOUT = 30
ORDER_TIMEOUT = datetime.timedelta(seconds=120)
USER_AGENT = "chatproxy (acme-python)"


class IssueError(Exception):
    """An order that did not end with a certificate, and why."""


@frozen
class Issued:
    """A new certificate (PEM, with its chain) and its private key (PEM)."""

    fullchain_pem: bytes
    key_pem: bytes


class AcmeIssuer:
    """Issues certificates from one ``[acme:NAME]`` account."""

    def __init__(self, account: AcmeAccount, account_directory: Path, challenge_directory: Path) -> None:
        self.account = account
        self.account_directory = account_directory
        self.challenge_directory = challenge_directory

    def _account_key(self) -> JWKEC:
        path = self.account_directory / "account.key"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            self.account_directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_private_key(path, key)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IssueError(f"{path} is not an EC private key")
        return JWKEC(key=key)

    def _client(self) -> client.ClientV2:
        """A client of the CA with the account registered (or found again)."""
        key = self._account_key()
        verify: bool | str = str(self.account.ca) if self.account.ca is not None else True
        net = client.ClientNetwork(key, alg=ES256, verify_ssl=verify,  # type: ignore[arg-type]
                                   user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT)
        directory = client.ClientV2.get_directory(self.account.directory, net)
        acme = client.ClientV2(directory, net)
        registration = messages.NewRegistration(contact=self.account.contact, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except errors.ConflictError as existing:  # the key already has an account
            net.account = messages.RegistrationResource(uri=existing.location, body=messages.Registration())
        return acme

    def issue(self, names: tuple[str, ...]) -> Issued:
        """Order a certificate for ``names`` and answer its HTTP-01 challenges
        (blocking).  Raises IssueError, or an ``acme``/``requests`` error."""
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        acme = self._client()
        order = acme.new_order(crypto_util.make_csr(key_pem, list(names)))
        tokens = []
        try:
            for authorization in order.authorizations:
                if authorization.body.status == messages.STATUS_VALID:
                    continue  # validated before (the CA reuses authorizations)
                challenge = next((c for c in authorization.body.challenges
                                  if isinstance(c.chall, challenges.HTTP01)), None)
                if challenge is None:
                    raise IssueError(f"the CA offers no http-01 challenge for {authorization.body.identifier.value}")
                response, validation = challenge.chall.response_and_validation(acme.net.key)
                token = challenge.chall.encode("token")
                write_file(self.challenge_directory / token, validation.encode("ascii"), 0o644)
                tokens.append(token)
                acme.answer_challenge(challenge, response)
            deadline = datetime.datetime.now() + ORDER_TIMEOUT
            try:
                finished = acme.poll_and_finalize(order, deadline)
            except errors.ValidationError as e:
                problems = [f"{a.body.identifier.value}: {c.error.detail if c.error else c.status}"
                            for a in e.failed_authzrs for c in a.body.challenges if c.error is not None]
                raise IssueError("validation failed: " + "; ".join(problems or ["no detail"])) from None
        finally:
            for token in tokens:
                (self.challenge_directory / token).unlink(missing_ok=True)
        if not finished.fullchain_pem:
            raise IssueError("the CA sent no certificate")
        return Issued(finished.fullchain_pem.encode("ascii"), key_pem)
