// Requests to trioagg's own API, relative to the page (so it works behind a path
// prefix), and its error envelope turned into an ApiError the page can show.

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// The API key the page sends (auth on): kept in this tab's sessionStorage, so it is gone
// when the tab closes and never appears in the address, a cookie or the page.
const KEY_ITEM = "trioagg.apiKey";

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM) ?? "";
  } catch {
    return ""; // storage disabled: no key
  }
}

export function setApiKey(value) {
  try {
    if (value) sessionStorage.setItem(KEY_ITEM, value);
    else sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // storage disabled: the key cannot be kept
  }
}

/** The absolute URL of an API path with its parameters (a list of [name, value]). */
function apiUrl(path, params = []) {
  const url = new URL(path, document.baseURI);
  // : , / need no escaping in a query; left plain, times and stat lists stay readable
  url.search = new URLSearchParams(params).toString().replace(/%3A|%2C|%2F/g, decodeURIComponent);
  return url;
}

/** GET a JSON answer; any error answer becomes an ApiError with the API's own words. */
export async function getJSON(path, params, signal) {
  let response;
  try {
    const headers = { Accept: "application/json" };
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    response = await fetch(apiUrl(path, params), { signal, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", `trioagg did not answer: ${error.message}`, []);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    if (error.name === "AbortError") throw error;
  }
  if (!response.ok) {
    const envelope = body && typeof body.error === "object" ? body.error : {};
    throw new ApiError(
      response.status,
      String(envelope.code ?? `http_${response.status}`),
      String(envelope.message ?? response.statusText),
      Array.isArray(envelope.details) ? envelope.details : [],
    );
  }
  return body;
}

/** The same request as a shell command. URLSearchParams percent-encodes quotes (and every
 * other character a shell would read), so the URL never breaks out of the single quotes. */
export function curlCommand(path, params) {
  // Never the key itself: the command names the variable the key commands use.
  const auth = apiKey() ? ` -H "Authorization: Bearer $TRIOAGG_API_KEY"` : "";
  return `curl -s '${apiUrl(path, params).href}'${auth}`;
}
