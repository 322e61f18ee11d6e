#include "dp_error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int dp_fail(struct dp_error *e, const char *code, int err, const char *fmt, ...)
{
	va_list ap;
	size_t n;

	e->code = code;
	va_start(ap, fmt);
	vsnprintf(e->message, sizeof(e->message), fmt, ap);
	va_end(ap);
	n = strlen(e->message);
	if (err && n < sizeof(e->message))
		snprintf(e->message + n, sizeof(e->message) - n, ": %s", strerror(err < 0 ? -err : err));
	return -1;
}
