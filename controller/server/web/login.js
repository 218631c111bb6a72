// The login page: posts the token (typed, or from a login link's #token=... fragment, which
// never reaches the server's logs) and goes to the dashboard once the session is set.
"use strict";

async function login(token) {
  const error = document.getElementById("login-error");
  error.hidden = true;
  const res = await fetch("/login", {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: "token=" + encodeURIComponent(token),
    redirect: "manual",
  });
  // a session: the server answers 303 to /, which fetch reports as an opaque redirect
  if (res.type === "opaqueredirect" || res.ok) {
    location.replace("/");
    return;
  }
  error.textContent = "Refused: " + (await res.text()).trim();
  error.hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("login");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    login(document.getElementById("token").value);
  });
  const m = location.hash.match(/^#token=(.+)$/);
  if (m) {
    history.replaceState(null, "", "/login");
    login(decodeURIComponent(m[1]));
  }
});
