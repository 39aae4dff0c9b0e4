// Starts Swagger UI on /docs. A file, not an inline script, so the page's CSP can forbid inline
// scripts; tokens typed into "Authorize" are kept in memory only (never in localStorage).
"use strict";

window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: false,
  // No call to the public validator: the page works offline and sends the document nowhere.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
