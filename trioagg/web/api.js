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
    response = await fetch(apiUrl(path, params), { signal, headers: { Accept: "application/json" } });
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
  return `curl -s '${apiUrl(path, params).href}'`;
}
