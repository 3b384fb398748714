#include <stdio.h>

/* __DATE__ and __TIME__ are the build's time: GCC takes them from SOURCE_DATE_EPOCH when it is
 * set (a construir server fixes it per job), so every replica of the build makes the same binary. */
int main(void)
{
	printf("hello from a construir build VM, built " __DATE__ " " __TIME__ "\n");
	return 0;
}
