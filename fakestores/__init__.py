"""Stand-ins for the app stores, speaking their real formats, for tests, `televote loadtest`
and the purchase benchmark (nothing here is imported by a service).

- `apple.FakeAppStore`: a certificate chain of its own (root -> intermediate -> leaf, with the
  OIDs Apple's App Store Server Library checks) signing StoreKit 2 transactions and App Store
  Server Notifications V2 exactly as Apple does (ES256 JWS, x5c header). Give its root to
  vote_svc (VOTE_APPLE_ROOT_CERTS) and the real `SignedDataVerifier` accepts what it signs.
- `google.FakePlayStore`: an HTTP server on a free port answering the Google Play Developer
  API calls that google-api-python-client makes (purchases.products.get / consume, voided
  purchases) and the OAuth token endpoint a service-account key is exchanged at, with a
  generated service-account key whose `token_uri` points at it.

`stack_environment()` gives vote_svc the configuration that points at both.
"""

from __future__ import annotations

from pathlib import Path

from fakestores.apple import FakeAppStore
from fakestores.google import FakePlayStore

__all__ = ["FakeAppStore", "FakePlayStore", "stack_environment"]


def stack_environment(apple: FakeAppStore, google: FakePlayStore, state_dir: Path,
                      ) -> dict[str, str]:
    """vote_svc's store configuration for a mesh that buys from these stand-ins."""
    state_dir.mkdir(parents=True, exist_ok=True)
    root = state_dir / "fake-apple-root.der"
    root.write_bytes(apple.root_der)
    key = state_dir / "fake-google-service-account.json"
    key.write_text(google.service_account_json())
    key.chmod(0o600)
    return {
        "VOTE_APPLE_ROOT_CERTS": str(root),
        "VOTE_APPLE_BUNDLE_ID": apple.bundle_id,
        "VOTE_APPLE_ENVIRONMENT": apple.environment,
        "VOTE_APPLE_APP_APPLE_ID": str(apple.app_apple_id),
        "VOTE_APPLE_ONLINE_CHECKS": "true" if apple.ocsp_url else "false",
        "VOTE_GOOGLE_PACKAGE_NAME": google.package_name,
        "VOTE_GOOGLE_CREDENTIALS": str(key),
        "VOTE_GOOGLE_API_URL": google.url,
        "VOTE_GOOGLE_PUSH_TOKEN": google.push_token,
    }
