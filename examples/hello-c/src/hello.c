#include <stdio.h>
#include <time.h>

int main(void)
{
	time_t now = time(NULL);
	printf("hello from a construir build VM, built %s", ctime(&now));
	return 0;
}
